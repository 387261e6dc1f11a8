from scratchlm.train.cli import main

raise SystemExit(main())
