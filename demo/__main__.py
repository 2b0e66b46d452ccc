"""`python -m vtprune.demo`: the Gradio app (see `vtprune.demo.app`)."""

from vtprune.demo.app import main

raise SystemExit(main())
