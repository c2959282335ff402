# An interactive shell on the serial console (ci/boot-debian).
echo "KEEL-L2 SHELL: Debian $(uname -r), $(nproc) vCPU(s); 'poweroff -f' ends the VM"
hostname keel-guest
export PS1='keel-guest:\w# '
# cttyhack makes the console the shell's controlling terminal, so Ctrl-C works.
setsid cttyhack sh
