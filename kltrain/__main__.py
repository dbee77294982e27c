from kltrain.cli import main

raise SystemExit(main())
