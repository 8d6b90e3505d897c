from l2l_ray.cli import main

raise SystemExit(main())
