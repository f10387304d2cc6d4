apt update
apt list --upgradable
apt upgrade -y
systemctl status inventory
journalctl -u inventory -n 100 --no-pager
df -h
du -sh /var/log/* | sort -h | tail
ls -la /var/backups/inventory/
cat /var/log/db-backup.log | tail -20
/usr/local/bin/db-backup.sh
tail -n 50 /var/log/db-backup.log
ssh -i /root/.ssh/backup_ed25519 backup@backup01.corp.internal 'df -h /srv/backups'
crontab -l
cat /etc/cron.d/db-backup
vim /etc/cron.d/db-backup
systemctl restart cron
free -m
uptime
ps aux --sort=-%mem | head
ss -tlnp
tail -f /var/log/nginx/error.log
grep ' 500 ' /var/log/nginx/access.log | tail
vim /etc/nginx/sites-available/inventory
nginx -t
systemctl reload nginx
cd /var/www/inventory
git log --oneline | head
cat config/settings.ini
mysql --defaults-extra-file=/root/.my.cnf -h db01.corp.internal inventory -e 'show processlist'
mysql -u app -p -h db01.corp.internal
systemctl restart inventory
journalctl -u inventory -f
last -n 20
lastlog | grep -v Never
grep 'Failed password' /var/log/auth.log | tail
passwd admin
usermod -aG sudo admin
id admin
visudo
apt install -y htop
htop
logrotate -d /etc/logrotate.d/nginx
ls -la /etc/ssl/private/
openssl x509 -in /etc/ssl/certs/inventory.corp.internal.pem -noout -dates
timedatectl
cat /etc/os-release
reboot
