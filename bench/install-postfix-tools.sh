#!/bin/sh
# Install Postfix's smtp-sink and smtp-source (package "postfix") without configuring or
# starting the Postfix daemon. Debian/Ubuntu; run as root (or prefix the commands with sudo).
set -eu
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postfix
# Package scripts may try to start the daemon; make sure it is not running.
if command -v postfix >/dev/null 2>&1; then
    postfix status >/dev/null 2>&1 && postfix stop || true
fi
ls -l /usr/sbin/smtp-sink /usr/sbin/smtp-source
