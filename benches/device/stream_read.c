// Read bandwidth of this host: T threads each sum their contiguous share of a buffer
// (as decode streams weights), best of several passes; with and without huge pages.
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
static size_t SZ; static int T; static char *buf; static pthread_barrier_t bar;
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static volatile long long sink[256];
static void *work(void *a){ long id=(long)a; size_t per=SZ/T; char*p=buf+id*per;
  for(int pass=0;pass<4;pass++){ pthread_barrier_wait(&bar);
    __m512i acc=_mm512_setzero_si512();
    for(size_t i=0;i<per;i+=256){ acc=_mm512_xor_si512(acc,_mm512_load_si512(p+i)); acc=_mm512_xor_si512(acc,_mm512_load_si512(p+i+64));
      acc=_mm512_xor_si512(acc,_mm512_load_si512(p+i+128)); acc=_mm512_xor_si512(acc,_mm512_load_si512(p+i+192)); }
    sink[id]=_mm512_reduce_add_epi64(acc); pthread_barrier_wait(&bar); }
  return 0; }
int main(int c,char**v){ T=atoi(v[1]); SZ=(size_t)atoi(v[2])<<20; int huge=atoi(v[3]);
  char*m=mmap(0,SZ+(2<<20),PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0);
  buf=(char*)(((uintptr_t)m+(2<<20)-1)&~(uintptr_t)((2<<20)-1));
  madvise(buf,SZ,huge?MADV_HUGEPAGE:MADV_NOHUGEPAGE); memset(buf,1,SZ);
  pthread_barrier_init(&bar,0,T+1); pthread_t th[256];
  for(long i=0;i<T;i++) pthread_create(&th[i],0,work,(void*)i);
  double best=1e9; for(int pass=0;pass<4;pass++){ pthread_barrier_wait(&bar); double t=now(); pthread_barrier_wait(&bar); t=now()-t; if(t<best)best=t; }
  for(int i=0;i<T;i++) pthread_join(th[i],0);
  printf("stream read: %d threads, %zu MiB, huge pages %d: %.1f GB/s\n",T,SZ>>20,huge,SZ/best/1e9); return 0; }
