"""``python -m drift_trainer.cli COMMAND ...``: the ``drift-trainer`` command."""

from drift_trainer.cli import main

raise SystemExit(main())
