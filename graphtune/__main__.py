from graphtune.cli import main

raise SystemExit(main())
