"""CNN feature extraction for emotion-recognition spectrogram corpora.

Plain Python, no Airflow: the DAGs in ``dags/`` call into this package. Modules
that import TensorFlow/Keras (``model``, ``worker``, ``probe`` child side,
``training``) run only in fresh processes started by ``runner``/``probe``.
"""

__version__ = "0.1.0"
