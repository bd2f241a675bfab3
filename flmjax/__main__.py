import sys

from flmjax.cli import main

sys.exit(main())
