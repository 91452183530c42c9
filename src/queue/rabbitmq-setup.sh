#!/bin/sh
# The broker's users and permissions: the vhost, one user per service with exactly the
# permissions its client needs on that vhost (nothing elsewhere), no guest. Idempotent, and it
# re-applies changed passwords. The NixOS module runs it on every boot of the broker (as the
# user whose Erlang cookie reaches the node); the tests run this same file.
#
#   rabbitmq-setup.sh RABBITMQCTL VHOST APP_USER APP_PASSWORD_FILE WORKER_USER WORKER_PASSWORD_FILE
#
# Passwords are read from the files (trailing newlines dropped, as the units drop them when
# they build AMQP_URL) and reach rabbitmqctl on stdin, never argv.
set -eu

if [ "$#" -ne 6 ]; then
  echo "usage: $0 RABBITMQCTL VHOST APP_USER APP_PASSWORD_FILE WORKER_USER WORKER_PASSWORD_FILE" >&2
  exit 2
fi
ctl=$1 vhost=$2 app=$3 app_password_file=$4 worker=$5 worker_password_file=$6

# What the clients do (src/queue): both declare the whole topology at connect (exchanges
# `pageviews` and `pageviews.dead`, queues `pageviews.tasks` and `pageviews.dead`, and their
# bindings), so both need configure on those names, read on the two exchanges (queue.bind) and
# on the task queue, and write on both queues (queue.bind) and on `pageviews.dead` (declaring a
# queue with a dead-letter exchange needs read on the queue and write on that exchange). Then
# the app publishes tasks to `pageviews`; the worker consumes `pageviews.tasks` and publishes
# only dead letters, so it may not write to `pageviews`. No other name (the default exchange,
# amq.*, any other queue) is reachable. Configure also lets a client delete these names:
# RabbitMQ has no declare-only permission.
topology='^pageviews(\.tasks|\.dead)?$'
worker_write='^pageviews\.(tasks|dead)$'

"$ctl" await_startup --timeout 300

if ! "$ctl" list_vhosts --quiet --no-table-headers | grep -qxF -- "$vhost"; then
  "$ctl" add_vhost "$vhost"
fi

existing="$("$ctl" list_users --quiet --no-table-headers | cut -f1)"

# user, password file, configure, write, read
setup_user() {
  password="$(cat "$2")"
  if [ -z "$password" ]; then
    echo "$0: the password file for $1 ($2) is empty" >&2
    exit 1
  fi
  if printf '%s\n' "$existing" | grep -qxF -- "$1"; then
    printf '%s\n' "$password" | "$ctl" change_password "$1"
  else
    printf '%s\n' "$password" | "$ctl" add_user "$1"
  fi
  "$ctl" set_user_tags "$1"
  "$ctl" set_permissions -p "$vhost" "$1" "$3" "$4" "$5"
}

setup_user "$app" "$app_password_file" "$topology" "$topology" "$topology"
setup_user "$worker" "$worker_password_file" "$topology" "$worker_write" "$topology"

if printf '%s\n' "$existing" | grep -qxF guest; then
  "$ctl" delete_user guest
fi
