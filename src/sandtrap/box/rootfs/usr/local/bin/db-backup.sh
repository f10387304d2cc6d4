#!/bin/bash
# Nightly backup: inventory DB dump + /var/www tree -> backup01 (rsync over ssh).
# Credentials for mysqldump come from /root/.my.cnf.
set -euo pipefail

BACKUP_DIR=/var/backups/inventory
REMOTE="backup@backup01.corp.internal:/srv/backups/$(hostname -s)"
DB_HOST=db01.corp.internal
DB_NAME=inventory
KEEP_DAYS=14
STAMP=$(date +%F)

log() { echo "$(date '+%F %T') $*"; }

mkdir -p "$BACKUP_DIR"
log "dumping $DB_NAME from $DB_HOST"
mysqldump --defaults-extra-file=/root/.my.cnf -h "$DB_HOST" \
    --single-transaction --routines --triggers "$DB_NAME" \
    | gzip -6 > "$BACKUP_DIR/$DB_NAME-$STAMP.sql.gz"

log "archiving /var/www/inventory"
tar -czf "$BACKUP_DIR/www-inventory-$STAMP.tar.gz" -C /var/www \
    --exclude='inventory/venv' --exclude='*.pyc' inventory

log "shipping to $REMOTE"
rsync -az --delete-after -e "ssh -i /root/.ssh/backup_ed25519 -o BatchMode=yes" \
    "$BACKUP_DIR/" "$REMOTE/"

find "$BACKUP_DIR" -type f -mtime +"$KEEP_DAYS" -delete
log "done"
logger -t db-backup "backup $STAMP ok"
