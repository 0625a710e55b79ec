from site_worker.cli import main

raise SystemExit(main())
