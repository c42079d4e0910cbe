FROM busybox
WORKDIR /deps
COPY deps.txt ./
# "Installs" every dependency listed in deps.txt (stands in for npm install / go mod download).
RUN while read -r dep; do mkdir -p "node_modules/$dep" && echo "module.exports = '$dep';" > "node_modules/$dep/index.js"; done < deps.txt
ENV NODE_PATH=/deps/node_modules
