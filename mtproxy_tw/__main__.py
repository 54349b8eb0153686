from mtproxy_tw.cli import main

raise SystemExit(main())
