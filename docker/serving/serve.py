"""`lmpipe serve` for the slim serving image.

The `lmpipe` command builds every stage's parser, which imports Spark, Great Expectations and
DeepSpeed code that this image leaves out; the server's own entry point needs none of them.
"""

import sys

from serving.serve import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
