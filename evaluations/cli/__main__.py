from evaluations.cli import main

raise SystemExit(main())
