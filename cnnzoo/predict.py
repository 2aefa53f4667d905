"""``python -m cnnzoo.predict MODEL IMAGES...``: the standalone predictor (cnnzoo.app.predict)."""
from cnnzoo.app.predict import main

if __name__ == "__main__":
    main()
