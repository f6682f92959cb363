# Airflow 3 with this project's pinned dependencies and the cnn_features package.
# For the GPU build of TensorFlow, build with --build-arg TF_PACKAGE="tensorflow[and-cuda]==2.21.0".
FROM apache/airflow:3.3.2-python3.11
ARG TF_PACKAGE=""
COPY --chown=airflow:root requirements.txt constraints.txt pyproject.toml /opt/project/
COPY --chown=airflow:root include /opt/project/include
RUN pip install --no-cache-dir -r /opt/project/requirements.txt -c /opt/project/constraints.txt \
    && pip install --no-cache-dir --no-deps /opt/project \
    && if [ -n "$TF_PACKAGE" ]; then pip install --no-cache-dir "$TF_PACKAGE"; fi
