from twin_pipelines.cli import main

raise SystemExit(main())
