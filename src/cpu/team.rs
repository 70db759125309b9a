//! A team of worker threads that spin between jobs, for short parallel steps that follow each
//! other closely: the hybrid executor's cold neurons, 32 times per token, each ~100-300 µs.
//!
//! Rayon's workers go to sleep soon after running out of work, and waking them (a futex per
//! thread) costs tens of microseconds on a virtual machine, which the hybrid paid twice per
//! layer while its GPU half ran. A team's members keep spinning for a while after each job, so
//! a new job starts on every core within about a microsecond. After [`Team::IDLE_BEFORE_PARK`]
//! without work they park, and cost nothing between tokens.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A job: called once per member with (member index, team size).
type Job<'a> = dyn Fn(usize, usize) + Sync + 'a;

/// A fixed set of threads running one job at a time; the caller of [`Team::run`] is member 0.
pub struct Team {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

struct Shared {
    size: usize,
    /// Bumped to post a job; members run each epoch's job once.
    epoch: AtomicU64,
    /// The posted job, valid while a `run` is in progress (see the SAFETY note there).
    job: UnsafeCell<Option<*const Job<'static>>>,
    /// Members other than the caller still running the current job.
    remaining: AtomicUsize,
    panicked: AtomicBool,
    quit: AtomicBool,
    /// Set by [`Team::rest`]: idle members park now instead of spinning on.
    rest: AtomicBool,
    /// Parking for idle members.
    parked: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by `run` while every worker is idle (remaining == 0, before
// the epoch is bumped) and read by workers only after they see the bump; the pointee is Sync.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

impl Team {
    /// How long a member spins without work before it parks.
    pub const IDLE_BEFORE_PARK: Duration = Duration::from_millis(5);

    /// A team of `size` members (at least 1): the caller and `size - 1` new threads.
    pub fn new(size: usize) -> Team {
        let size = size.max(1);
        let shared = Arc::new(Shared {
            size,
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            remaining: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            quit: AtomicBool::new(false),
            rest: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..size)
            .map(|member| {
                let shared = shared.clone();
                std::thread::Builder::new().name(format!("ember-team-{member}")).spawn(move || shared.serve(member)).expect("cannot start a worker thread")
            })
            .collect();
        Team { shared, workers }
    }

    pub fn size(&self) -> usize {
        self.shared.size
    }

    /// Runs `job(member, size)` on every member at once and returns when all have finished.
    /// A panic in any member is raised here once all have stopped.
    pub fn run(&mut self, job: &Job<'_>) {
        let s = &*self.shared;
        if s.size == 1 {
            return job(0, 1);
        }
        // SAFETY: no worker is running a job (the last run waited for remaining == 0), and
        // this one returns only after every worker has finished with the pointer, so erasing
        // the lifetime never lets it outlive `job`. `&mut self` rules out concurrent runs.
        unsafe {
            let ptr: *const Job<'_> = job;
            *s.job.get() = Some(std::mem::transmute::<*const Job<'_>, *const Job<'static>>(ptr));
        }
        s.remaining.store(s.size - 1, Ordering::Relaxed);
        s.rest.store(false, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.parked.load(Ordering::SeqCst) > 0 {
            let _guard = s.lock.lock().unwrap();
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| job(0, s.size)));
        while s.remaining.load(Ordering::Acquire) > 0 {
            std::hint::spin_loop();
        }
        if let Err(payload) = mine {
            resume_unwind(payload);
        }
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a worker thread of the team panicked (its message is above)");
        }
    }
}

impl Team {
    /// Lets idle members park at once rather than spin until [`Team::IDLE_BEFORE_PARK`]: for
    /// a caller about to run other parallel work (rayon), which spinning members would slow
    /// down on a machine with no spare cores. The next [`Team::run`] wakes them.
    pub fn rest(&self) {
        self.shared.rest.store(true, Ordering::Relaxed);
    }
}

/// A one-off task handed to code that runs products on a [`Team`]: the first member to reach
/// it runs it while the others start on the product, and later calls do nothing. The hybrid
/// hands its hot neurons' upload and submission to the cold FFN's team this way, so that they
/// start on a member already spinning instead of waking a thread (session 13 measured the main
/// thread waiting 1.6-4.9 ms a token for such a thread on a 16-core host).
pub struct Aside<'a>(Mutex<Option<Box<dyn FnOnce() + Send + 'a>>>);

impl<'a> Aside<'a> {
    pub fn new(task: impl FnOnce() + Send + 'a) -> Aside<'a> {
        Aside(Mutex::new(Some(Box::new(task))))
    }

    /// Nothing to run.
    pub fn none() -> Aside<'a> {
        Aside(Mutex::new(None))
    }

    /// Runs the task unless it has run (or is running) already; returns at once then.
    pub fn run(&self) {
        let task = self.0.lock().unwrap().take();
        if let Some(task) = task {
            task();
        }
    }
}

impl Shared {
    fn serve(&self, member: usize) {
        let mut seen = 0u64;
        loop {
            // Spin for the next epoch, then park.
            let idle_since = Instant::now();
            let mut spins = 0u32;
            loop {
                if self.quit.load(Ordering::Acquire) {
                    return;
                }
                let e = self.epoch.load(Ordering::Acquire);
                if e != seen {
                    seen = e;
                    break;
                }
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(1024) && (self.rest.load(Ordering::Relaxed) || idle_since.elapsed() > Team::IDLE_BEFORE_PARK) {
                    let mut guard = self.lock.lock().unwrap();
                    self.parked.fetch_add(1, Ordering::SeqCst);
                    while self.epoch.load(Ordering::SeqCst) == seen && !self.quit.load(Ordering::SeqCst) {
                        guard = self.wake.wait(guard).unwrap();
                    }
                    self.parked.fetch_sub(1, Ordering::SeqCst);
                } else {
                    std::hint::spin_loop();
                }
            }
            // SAFETY: see `run`: the job is valid until this member decrements `remaining`.
            let job = unsafe { (*self.job.get()).expect("a job is posted with the epoch") };
            let job: &Job<'_> = unsafe { &*job };
            if catch_unwind(AssertUnwindSafe(|| job(member, self.size))).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.remaining.fetch_sub(1, Ordering::Release);
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.quit.store(true, Ordering::SeqCst);
        {
            let _guard = self.shared.lock.lock().unwrap();
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_aside_runs_once_whoever_reaches_it() {
        let count = AtomicUsize::new(0);
        let aside = Aside::new(|| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        let mut team = Team::new(3);
        for _ in 0..3 {
            team.run(&|_, _| aside.run());
        }
        aside.run();
        assert_eq!(count.load(Ordering::Relaxed), 1);
        Aside::none().run();
    }

    #[test]
    fn every_member_runs_each_job_once() {
        let mut team = Team::new(3);
        let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
        for round in 1..=200 {
            team.run(&|m, n| {
                assert_eq!(n, 3);
                hits[m].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == round));
        }
    }

    #[test]
    fn parked_members_wake_for_the_next_job() {
        let mut team = Team::new(2);
        let count = AtomicUsize::new(0);
        team.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        std::thread::sleep(Team::IDLE_BEFORE_PARK * 3);
        team.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn resting_members_park_and_wake_for_the_next_job() {
        let mut team = Team::new(3);
        let count = AtomicUsize::new(0);
        team.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        team.rest();
        let t = Instant::now();
        while team.shared.parked.load(Ordering::SeqCst) < 2 {
            // Promptly, but a loaded machine may not run them for a while.
            assert!(t.elapsed() < Duration::from_secs(2), "members still spin after rest()");
            std::hint::spin_loop();
        }
        team.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn a_worker_panic_reaches_the_caller() {
        let mut team = Team::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| team.run(&|m, _| assert_ne!(m, 1, "member 1 fails"))));
        assert!(r.is_err());
        // The team still works afterwards.
        let count = AtomicUsize::new(0);
        team.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }
}
