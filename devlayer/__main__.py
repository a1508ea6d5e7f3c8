"""``python -m devlayer`` runs the command line."""

from devlayer.cli import main

raise SystemExit(main())
