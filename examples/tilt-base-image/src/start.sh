#!/bin/sh
# The app: serves its page on :8080 (busybox httpd stands in for a node server). The page is
# made at start from the sources and the dependencies the base image installed.
mkdir -p /tmp/www
{
    cat /app/index.html
    echo "<p>dependencies: $(tr '\n' ' ' </app/deps-seen.txt)</p>"
    echo "<p>served by machine $(hostname)</p>"
} >/tmp/www/index.html
echo "hello from the app: serving on :8080"
exec httpd -f -p 8080 -h /tmp/www
