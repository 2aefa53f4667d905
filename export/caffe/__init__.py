"""Caffe's format: a deploy network and its weights written from the spec and canonical weights
(``writer``, ``files``), run and verified in OpenCV's DNN module (``export.runtimes``)."""
