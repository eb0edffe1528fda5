import sys

from nbdquorum.worker.main import main

sys.exit(main())
