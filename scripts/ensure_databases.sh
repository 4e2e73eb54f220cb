#!/usr/bin/env bash
# The tests need PostgreSQL and MariaDB on their default ports. Machines of this project start both;
# if one is down and this machine has the server installed, start it (best effort, never fatal:
# the tests themselves report an unreachable database, as a failure under CI=true).
set -u
if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    echo "ensure_databases: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
  fi
fi
if command -v mysqladmin >/dev/null 2>&1 && ! mysqladmin -h 127.0.0.1 -u root ping >/dev/null 2>&1; then
  if [ -x /usr/sbin/mariadbd ]; then
    echo "ensure_databases: starting MariaDB"
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
    for _ in $(seq 1 30); do mysqladmin -h 127.0.0.1 -u root ping >/dev/null 2>&1 && break; sleep 1; done
  fi
fi
exit 0
