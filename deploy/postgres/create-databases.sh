#!/bin/sh
# Creates one database per component, owned by $POSTGRES_USER: the names in $C4C_DATABASES
# (space-separated). The postgres image runs it once, when its data volume is new
# (/docker-entrypoint-initdb.d); running it again skips the databases that exist.
set -eu
for name in ${C4C_DATABASES:?list the databases to create}; do
    exists=$(psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
        --tuples-only --no-align --command "SELECT 1 FROM pg_database WHERE datname = '$name'")
    if [ "$exists" = 1 ]; then
        echo "database $name exists"
    else
        psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
            --command "CREATE DATABASE \"$name\" OWNER \"$POSTGRES_USER\""
        echo "created database $name"
    fi
done
