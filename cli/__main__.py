from flannel_xdp.cli import main

raise SystemExit(main())
