# The Streamfold worker and registry image used by docker-compose.yml.
FROM python:3.11-slim
WORKDIR /srv/streamfold
COPY pyproject.toml README.md ./
COPY app app
COPY agents agents
COPY tables tables
COPY schemas schemas
RUN pip install --no-cache-dir .
ENV STREAMFOLD_HOME=/var/lib/streamfold
ENTRYPOINT ["streamfold"]
