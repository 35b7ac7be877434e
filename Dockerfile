# syntax=docker/dockerfile:1
# crmguard: the operator and its backup/restore jobs, one image (the jobs run `crmguard backup run` etc. with the
# same binary). Build from the repository root:
#   docker build -t ghcr.io/crmguard/crmguard:0.1.0 .
# The binary is built with the `dist` profile (LTO; what the benchmarks measure). The runtime carries the
# database clients the jobs call: pg_dump/pg_restore/psql 17 (pg_dump must be at least the server's major
# version; 17 dumps servers back to 9.2) and the MariaDB client (mysqldump/mysql, for MySQL and MariaDB).

ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml clippy.toml ./
COPY operator operator
# A workspace member; only its manifest and sources are needed for cargo to resolve the workspace.
COPY e2e e2e
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --profile dist -p crmguard \
    && install -m 0755 target/dist/crmguard /crmguard

FROM debian:${DEBIAN}-slim
ARG DEBIAN
ARG PG_MAJOR=17
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates curl; \
    install -d /usr/share/postgresql-common/pgdg; \
    curl -fsSL -o /usr/share/postgresql-common/pgdg/apt.postgresql.org.asc \
      https://www.postgresql.org/media/keys/ACCC4CF8.asc; \
    echo "deb [signed-by=/usr/share/postgresql-common/pgdg/apt.postgresql.org.asc] https://apt.postgresql.org/pub/repos/apt ${DEBIAN}-pgdg main" \
      > /etc/apt/sources.list.d/pgdg.list; \
    apt-get update; \
    apt-get install -y --no-install-recommends "postgresql-client-${PG_MAJOR}" mariadb-client; \
    apt-get purge -y curl; \
    apt-get autoremove -y; \
    rm -rf /var/lib/apt/lists/*; \
    "/usr/lib/postgresql/${PG_MAJOR}/bin/pg_dump" --version; \
    mysqldump --version
COPY --from=build /crmguard /usr/local/bin/crmguard
# The real client binaries first (not Debian's version-picking wrappers); HOME on the jobs' writable /tmp.
ENV PATH="/usr/lib/postgresql/${PG_MAJOR}/bin:${PATH}" \
    HOME=/tmp
# Matches the pods' runAsUser (chart and job templates): non-root, no shell needed.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/crmguard"]
CMD ["run"]
