from tb_gateway.cli import main

raise SystemExit(main())
