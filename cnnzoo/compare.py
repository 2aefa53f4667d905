"""``python -m cnnzoo.compare RUNS...``: compare training runs (cnnzoo.app.compare)."""
from cnnzoo.app.compare import main

if __name__ == "__main__":
    main()
