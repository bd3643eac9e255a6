"""xmodal on a Ray cluster: bulk embedding with Ray Data (`embed.py`, `xmodal embed --engine
ray`) and serving replicas with Ray Serve (`serve.py`, `xmodal serve --engine ray`).

Only the CLI imports these modules, lazily: the single-machine path never needs Ray installed
(`pip install 'xmodal[ray]'` adds it). docs/deployment.md describes the deployment.
"""
