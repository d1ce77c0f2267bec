import sys

from data_tools.phantom.cohort import main

sys.exit(main())
