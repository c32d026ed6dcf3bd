"""edgeseg on NVIDIA Triton Inference Server.

:mod:`edgeseg.triton.client` is a Segmenter that sends a series' stored pixels to a Triton model
(``--backend triton://HOST:PORT/MODEL``); :mod:`edgeseg.triton.server` starts the tritonserver
binary of the ``nvidia-pytriton`` wheel on one box. The model repository itself is written by
``edgeseg export-triton`` (:mod:`edgeseg.export.triton_repo`). ``tritonclient`` is optional
(``pip install 'edgeseg[triton]'``) and imported only when a Triton backend is opened.
"""
