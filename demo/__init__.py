"""The Gradio app that shows which visual tokens survive."""
