FROM debian:12
RUN apt-get update && apt-get -y install --no-install-recommends golang ca-certificates && rm -rf /var/lib/apt/lists/*
