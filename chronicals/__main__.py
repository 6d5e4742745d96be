"""`python -m chronicals finetune ...`: see chronicals/cli.py."""

from chronicals.cli import main

raise SystemExit(main())
