#!/usr/bin/env bash
# A tracking server for a team or several machines: PostgreSQL, then `mlflow server` with the
# PostgreSQL backend store and the artifact proxy (--serve-artifacts). docs/scale-out.md walks through it.
#
#   bash mlruns_config/start_server.sh                    # settings from server.env; the environment wins
#   MLFLOW_HOST=0.0.0.0 MLFLOW_SERVER_ALLOWED_HOSTS='mlflow.lab:5000' PG_LISTEN='*' \
#     PG_CLIENTS='192.0.2.0/24' MLFLOW_AUTH=1 bash mlruns_config/start_server.sh
#
# Needs `pip install -e ".[server]"` (psycopg2, Flask-WTF) and PostgreSQL's server programs (Debian:
# `apt-get install postgresql`), unless MLFLOW_BACKEND_STORE_URI names a database that runs elsewhere.
# At first start it makes a PostgreSQL cluster in $LORAFLOW_SERVER_HOME/pgdata with a role `loraflow`
# that owns the databases mlflow, optuna (for `loraflow tune --storage`) and mlflow_auth.
# Passwords: LORAFLOW_DB_PASSWORD (and, with MLFLOW_AUTH=1, MLFLOW_AUTH_ADMIN_PASSWORD) from the
# environment, else generated once into $LORAFLOW_SERVER_HOME/secrets.env (mode 600). None is committed
# and none is put on a command line: the programs get them through the environment (PGPASSWORD).
# Runs in the foreground; Ctrl+C or SIGTERM stops mlflow, then the PostgreSQL this script started.
set -euo pipefail
set -m  # mlflow runs as a job with its own process group, so stopping it stops its uvicorn workers too
here="$(cd "$(dirname "$0")" && pwd)"

say() { echo "start_server: $*" >&2; }
die() { say "error: $*"; exit 2; }

# server.env holds the defaults; a variable already set in the environment keeps its value.
while IFS='=' read -r key value; do
  [[ $key =~ ^[A-Z_][A-Z0-9_]*$ ]] || continue
  [[ -n ${!key+set} ]] || export "$key=$value"
done < "${LORAFLOW_SERVER_ENV:-$here/server.env}"

mkdir -p "$LORAFLOW_SERVER_HOME"
home="$(cd "$LORAFLOW_SERVER_HOME" && pwd)"
secrets="$home/secrets.env"
mlflow_bin="${MLFLOW_BIN:-mlflow}"
command -v "$mlflow_bin" >/dev/null || die "no '$mlflow_bin' on PATH: activate the venv (pip install -e \".[server]\")"
python_bin="${PYTHON:-$(dirname "$(command -v "$mlflow_bin")")/python}"  # the Python mlflow runs on

secret() { head -c 18 /dev/urandom | base64 | tr '+/' '-_'; }  # 24 characters, safe in a URL

remember_secret() {  # remember_secret NAME: keep $NAME from the environment, else secrets.env, else a new one
  local name="$1" stored=""
  [[ -n ${!name:-} ]] && return
  [[ -f $secrets ]] && stored="$(sed -n "s/^$name=//p" "$secrets" | tail -n 1)"
  if [[ -z $stored ]]; then
    stored="$(secret)"
    (umask 077 && echo "$name=$stored" >> "$secrets")
    say "generated $name into $secrets"
  fi
  export "$name=$stored"
}

# --- PostgreSQL: a cluster of our own, unless MLFLOW_BACKEND_STORE_URI names another database -------

pg_bindir() {
  if [[ -n ${PG_BINDIR:-} ]]; then echo "$PG_BINDIR"; return; fi
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [[ -x $dir/initdb ]] && { echo "$dir"; return; }
  done
  command -v initdb >/dev/null && dirname "$(command -v initdb)" && return
  die "no PostgreSQL server programs (initdb, pg_ctl): apt-get install postgresql, set PG_BINDIR, or set MLFLOW_BACKEND_STORE_URI"
}

as_cluster_owner() {  # PostgreSQL refuses to run as root: root runs it as the postgres user
  if [[ $(id -u) -eq 0 ]]; then runuser -u "${PG_OS_USER:-postgres}" -- "$@"; else "$@"; fi
}

pg_started_here=""
mlflow_pid=""

start_postgres() {
  local bin pgdata="$home/pgdata" sockets="$home/run" logs="$home/log" local_client="$1"
  bin="$(pg_bindir)"
  mkdir -p "$pgdata" "$sockets" "$logs"
  if [[ $(id -u) -eq 0 ]]; then
    chown "${PG_OS_USER:-postgres}" "$pgdata" "$sockets" "$logs"
    as_cluster_owner test -x "$home" || die "$home must be searchable by the ${PG_OS_USER:-postgres} user (chmod o+x)"
  fi
  chmod 700 "$pgdata" "$sockets"
  if [[ ! -s $pgdata/PG_VERSION ]]; then
    say "initialising a PostgreSQL cluster in $pgdata"
    as_cluster_owner "$bin/initdb" -D "$pgdata" -U postgres -E UTF8 --no-instructions >"$home/initdb.log"
    echo "include_if_exists = 'loraflow.conf'" >> "$pgdata/postgresql.conf"
  fi
  # Rewritten at every start, so a changed setting takes effect. The socket folder is mode 700: only the
  # cluster's owner (and root) reach the trusted socket; every TCP client needs the password.
  {
    echo "listen_addresses = '$PG_LISTEN'"
    echo "port = $PG_PORT"
    echo "unix_socket_directories = '$sockets'"
    echo "log_connections = on"
  } > "$pgdata/loraflow.conf"
  {
    echo "local all all trust"
    echo "host all loraflow $local_client scram-sha-256"  # mlflow server, on this host
    for cidr in $PG_CLIENTS; do echo "host all all $cidr scram-sha-256"; done
  } > "$pgdata/pg_hba.conf"
  [[ $(id -u) -eq 0 ]] && chown "${PG_OS_USER:-postgres}" "$pgdata/loraflow.conf" "$pgdata/pg_hba.conf"
  if as_cluster_owner "$bin/pg_ctl" -D "$pgdata" status >/dev/null 2>&1; then
    say "PostgreSQL is already running on $pgdata: using it (and leaving it running)"
  else
    as_cluster_owner "$bin/pg_ctl" -D "$pgdata" -l "$logs/postgres.log" -w -t 60 start >/dev/null \
      || die "PostgreSQL did not start: see $logs/postgres.log"
    pg_started_here="$bin/pg_ctl"
  fi
  local password="${LORAFLOW_DB_PASSWORD//\'/\'\'}"  # quoted for SQL; it goes in on stdin, not argv
  "$bin/psql" -h "$sockets" -p "$PG_PORT" -U postgres -d postgres -q -v ON_ERROR_STOP=1 >/dev/null <<SQL
SELECT 'CREATE ROLE loraflow' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'loraflow') \gexec
ALTER ROLE loraflow WITH LOGIN PASSWORD '$password';
SELECT format('CREATE DATABASE %I OWNER loraflow', name) FROM unnest(ARRAY['mlflow', 'optuna', 'mlflow_auth']) AS name
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = name) \gexec
SQL
}

stop_all() {
  trap - EXIT
  trap '' INT TERM  # a second Ctrl+C must not cut the stop short
  if [[ -n $mlflow_pid ]] && kill -0 "$mlflow_pid" 2>/dev/null; then
    say "stopping mlflow server"
    kill -TERM -- "-$mlflow_pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$mlflow_pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$mlflow_pid" 2>/dev/null || true
  fi
  if [[ -n $pg_started_here ]]; then
    say "stopping PostgreSQL"
    as_cluster_owner "$pg_started_here" -D "$home/pgdata" -m fast -w -t 60 stop >/dev/null || true
  fi
}
trap stop_all EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

if [[ -z ${MLFLOW_BACKEND_STORE_URI:-} ]]; then
  remember_secret LORAFLOW_DB_PASSWORD
  db_host="${PG_LISTEN%%,*}"
  [[ $db_host == "*" || $db_host == "0.0.0.0" ]] && db_host=127.0.0.1
  start_postgres "$db_host/32"
  db="loraflow@$db_host:$PG_PORT"
  export PGPASSWORD="$LORAFLOW_DB_PASSWORD"  # libpq reads it: the URIs below carry no password
  export MLFLOW_BACKEND_STORE_URI="postgresql://$db/mlflow"
  # Optuna's tables, made here once: workers started at once on an empty database race to create them.
  OPTUNA_URL="postgresql://$db/optuna" "$python_bin" \
    -c 'import os, optuna; optuna.storages.RDBStorage(os.environ["OPTUNA_URL"])' \
    || say "warning: could not create Optuna's tables in postgresql://$db/optuna (the first worker will)"
  auth_db_uri="postgresql://$db/mlflow_auth"
  say "Optuna storage for workers: --storage postgresql://loraflow@<this host>:$PG_PORT/optuna" \
      "(password: LORAFLOW_DB_PASSWORD in $secrets; give it to workers as PGPASSWORD)"
else
  auth_db_uri="${MLFLOW_AUTH_DATABASE_URI:-sqlite:///$home/basic_auth.db}"
fi

# --- mlflow server ---------------------------------------------------------------------------------

args=(server --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" --serve-artifacts
      --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-$home/artifacts}"
      --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS")
# MLflow reads MLFLOW_SERVER_ALLOWED_HOSTS itself; unset, it allows localhost and the private ranges.
[[ -n ${MLFLOW_SERVER_ALLOWED_HOSTS:-} ]] && args+=(--allowed-hosts "$MLFLOW_SERVER_ALLOWED_HOSTS")
if [[ ${MLFLOW_AUTH:-0} == 1 ]]; then
  remember_secret MLFLOW_AUTH_ADMIN_PASSWORD      # used once, when MLflow creates the admin user
  remember_secret MLFLOW_FLASK_SERVER_SECRET_KEY  # one key for every worker (CSRF tokens)
  auth_config="$home/basic_auth.ini"
  (umask 077 && cat > "$auth_config" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = $auth_db_uri
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
  )
  export MLFLOW_AUTH_CONFIG_PATH="$auth_config"
  args+=(--app-name basic-auth)
  say "basic auth on: user admin, password MLFLOW_AUTH_ADMIN_PASSWORD in $secrets (first start only)"
fi

say "tracking server http://$MLFLOW_HOST:$MLFLOW_PORT (backend ${MLFLOW_BACKEND_STORE_URI%%://*}, artifacts proxied)"
"$mlflow_bin" "${args[@]}" &
mlflow_pid=$!
wait "$mlflow_pid"
