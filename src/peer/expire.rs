//! Messages whose time ran out while queued. The queue manager finds them
//! by their deadline wherever they wait (a retry, a held message, a pool
//! nobody takes from: a dead, blackholed or held peer) and hands them
//! here; these threads fail what is left of each (`5.4.7`, the failed
//! area, a DSN to a local sender) whatever the peer's state, so a dead
//! peer's queue ends on time, not at the pace of its probes. A job in
//! flight is failed by its worker instead.

use std::io;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, select};
use log::warn;

use super::PeerViews;
use super::worker::Records;
use crate::message::Job;
use crate::peer::bounce::Bounce;
use crate::queue::{Admission, Queue};
use crate::smtp::Reply;
use crate::spool::Spool;
use crate::sys::owned::Owned;
use crate::sys::printable::Printable;

/// Threads that fail expired jobs: a DSN is a durable spool write, and two
/// writers let the spool's group commit share its flushes.
const THREADS: usize = 2;

/// The running expiry threads.
pub struct Expirer {
    threads: Vec<Owned<()>>,
    jobs: Receiver<Job>,
    stop: Option<Sender<()>>,
}

impl Expirer {
    /// Starts failing the jobs that come on `jobs`; `views` gives each
    /// peer's name and counters.
    pub fn start(
        jobs: Receiver<Job>,
        queue: Arc<Queue>,
        spool: Arc<Spool>,
        bounce: Arc<Bounce>,
        views: PeerViews,
    ) -> io::Result<Expirer> {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let mut threads = Vec::new();
        for i in 0..THREADS {
            let (jobs, stop) = (jobs.clone(), stop_rx.clone());
            let (queue, spool, bounce, views) =
                (queue.clone(), spool.clone(), bounce.clone(), views.clone());
            let spawned = Owned::spawn(format!("expire-{i}"), move || {
                let records = Records {
                    spool: &spool,
                    queue: &queue,
                    bounce: &bounce,
                };
                loop {
                    select! {
                        recv(stop) -> _ => break,
                        recv(jobs) -> job => match job {
                            Ok(job) => fail(records, &views, &job),
                            Err(_) => break,
                        },
                    }
                }
            });
            match spawned {
                Ok(h) => threads.push(h),
                Err(e) => {
                    drop(stop_tx);
                    threads.into_iter().for_each(|h| {
                        h.join();
                    });
                    return Err(e);
                }
            }
        }
        Ok(Expirer {
            threads,
            jobs,
            stop: Some(stop_tx),
        })
    }

    /// Stops the threads after the job each has in hand; returns how many
    /// jobs were left (they stay in the spool, and expire at the next
    /// start).
    pub fn stop(mut self) -> usize {
        self.stop.take();
        for h in self.threads.drain(..) {
            h.join();
        }
        self.jobs.len()
    }
}

/// Fails what is left of `job`, with the last reply it had, if any;
/// unless an operator deleted it meanwhile.
fn fail(records: Records<'_>, views: &PeerViews, job: &Job) {
    if records.queue.admission(job) == Admission::Deleted {
        return;
    }
    let Some(view) = views.list().into_iter().nth(job.peer) else {
        // Views are complete before this starts; a job of no peer stays
        // in the spool, and is said.
        warn!(
            "{} expired for unknown peer {}: left in the spool",
            job.message.id, job.peer
        );
        return;
    };
    let text = match records.queue.last_reply(job.peer, &job.message.id) {
        Some(last) if !last.is_empty() => format!(
            "5.4.7 delivery time expired; last attempt: {}",
            Printable(&last)
        ),
        _ => "5.4.7 delivery time expired".into(),
    };
    let reply = Reply::new(554, text);
    records.failed(view.stats(), view.name(), job, &job.rcpts, &reply, None);
}
