#!/bin/sh
# The app: serves its page on :8080 (busybox httpd stands in for a node server). The page is
# made from the sources and the dependencies the base image installed: at start, and again by
# `sh /app/start.sh render` (what `strata dev` runs after it syncs a new index.html).
render() {
    mkdir -p /tmp/www
    {
        cat /app/index.html
        echo "<p>dependencies: $(tr '\n' ' ' </app/deps-seen.txt)</p>"
        echo "<p>served by machine $(hostname)</p>"
    } >/tmp/www/index.html.new
    mv /tmp/www/index.html.new /tmp/www/index.html
}
render
[ "$1" = render ] && exit 0
echo "hello from the app: serving on :8080"
exec httpd -f -p 8080 -h /tmp/www
