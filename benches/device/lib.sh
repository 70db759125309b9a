# Sourced by the device scripts: the one place that sets up Vulkan and obtains llama.cpp's CUDA
# build, so that several scripts in one call (or calls on the same warm machine) build it once.
#
#   vulkan_setup           unpack the carried Vulkan loader (.gl) and give wgpu a runtime dir
#   llama_cuda_start D     start the build in the background unless llama.cpp's binaries are
#                          already there: built by an earlier script on this machine, being built
#                          right now, or carried as .dev/lcbin/lcbin.tar.xz.* (see llama_cuda_pack)
#   llama_cuda_wait        block until the build has finished; prints its last lines
#   llama_cuda_pack OUTDIR pack the built binaries and libraries into <= 15 MiB parts, so that a
#                          later call can carry them instead of building for 3.5 minutes
# NO_LLAMA=1 makes start and wait no-ops (the scripts then skip llama.cpp's rows).
LCC=/tmp/lcc-cuda/llama.cpp/build/bin
LB=$LCC/llama-bench
LBB=$LCC/llama-batched-bench
LC_STATUS=/tmp/lc-cuda-build.txt

vulkan_setup() {
  [ -d .gl ] && { for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig; }
  export XDG_RUNTIME_DIR=$(mktemp -d)
}

llama_cuda_start() {
  local d=$1
  [ "${NO_LLAMA:-0}" = 1 ] && return
  if [ -x $LB ] && [ -x $LBB ]; then echo built > $LC_STATUS; return; fi
  if compgen -G ".dev/lcbin/lcbin.tar.xz.*" > /dev/null; then
    mkdir -p $LCC && cat .dev/lcbin/lcbin.tar.xz.* | tar xJf - -C $LCC && echo "built (carried)" > $LC_STATUS && return
  fi
  mkdir /tmp/lc-cuda-lock 2>/dev/null || return   # a build is under way
  rm -f $LC_STATUS
  (bash $d/llama-cpp.sh build-cuda .lc/lcsrc.tar.xz /tmp/lcc-cuda > /tmp/lc-cuda-log.txt 2>&1
   # llama-batched-bench sizes its KV cache by -c, as a user's context would be (llama-bench's
   # context is only p + n).
   cmake --build /tmp/lcc-cuda/llama.cpp/build --target llama-batched-bench >> /tmp/lc-cuda-log.txt 2>&1
   echo built >> $LC_STATUS) &
}

llama_cuda_wait() {
  [ "${NO_LLAMA:-0}" = 1 ] && return
  until grep -q built $LC_STATUS 2>/dev/null; do sleep 2; done
  tail -1 /tmp/lc-cuda-log.txt 2>/dev/null; cat $LC_STATUS
  export LD_LIBRARY_PATH=$LCC${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
}

llama_cuda_pack() {
  local out=$1
  [ -x $LB ] && [ -x $LBB ] || return
  (cd $LCC && tar cf - llama-bench llama-batched-bench *.so* 2>/dev/null | xz -T0 -6 | split -b 15M - "$out/lcbin.tar.xz.")
  ls -la "$out"/lcbin.tar.xz.*
}
