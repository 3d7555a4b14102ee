from hf_compress.cli import main

raise SystemExit(main())
