"""`python -m vtprune.eval`: the evaluation runner (`vtprune eval`)."""

from vtprune.eval.runner import main

raise SystemExit(main())
