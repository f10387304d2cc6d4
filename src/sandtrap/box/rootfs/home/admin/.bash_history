sudo -i
cd /var/www/inventory
git status
git pull origin main
source venv/bin/activate
pip install -r requirements.txt
deactivate
sudo systemctl restart inventory
sudo systemctl status inventory
sudo journalctl -u inventory -n 200 --no-pager
curl -s -o /dev/null -w '%{http_code}\n' http://127.0.0.1:8000/
curl -s http://127.0.0.1:8000/api/v1/assets | head -c 500
tail -n 100 /var/log/nginx/access.log
tail -f /var/log/nginx/access.log | grep -v healthz
grep ' 50[0-9] ' /var/log/nginx/access.log | wc -l
vim config/settings.ini
vim .env
mysql -u app -p -h db01.corp.internal inventory
mysql -u inventory -p -h db01.corp.internal inventory
ssh db01.corp.internal
ssh git.corp.internal
git log --oneline -n 15
git diff HEAD~1
git stash
git pull
git stash pop
sudo systemctl restart inventory
ls -la /var/backups/inventory/
sudo tail /var/log/db-backup.log
df -h
free -m
top
ps aux | grep gunicorn
sudo ss -tlnp
sudo tail -f /var/log/auth.log
scp assets-export.csv backup01.corp.internal:/tmp/
sudo apt update && sudo apt upgrade
sudo vim /etc/nginx/sites-available/inventory
sudo nginx -t && sudo systemctl reload nginx
cd ~
ls -la
cat .ssh/known_hosts | wc -l
ssh-keygen -lf ~/.ssh/authorized_keys
history | grep mysql
exit
