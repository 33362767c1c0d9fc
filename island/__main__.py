from island.cli import main

raise SystemExit(main())
