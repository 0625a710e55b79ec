"""`python -m benchmarks [--quick] [--only NAME] [--json PATH]`: run them all, print one table."""

from benchmarks.runner import main

raise SystemExit(main())
