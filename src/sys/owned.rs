//! Threads the relay owns: each is named, joined when its owner drops it
//! (or asks), and a panic that ended it is logged with its name when it
//! is joined, instead of vanishing with an ignored join result.

use std::any::Any;
use std::io;
use std::thread::{self, JoinHandle};

use log::error;

/// A named thread, joined on drop.
#[derive(Debug)]
pub struct Owned<T> {
    name: String,
    handle: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> Owned<T> {
    /// Starts `f` on a thread called `name`.
    pub fn spawn(
        name: impl Into<String>,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<Owned<T>> {
        let name = name.into();
        let handle = thread::Builder::new().name(name.clone()).spawn(f)?;
        Ok(Owned {
            name,
            handle: Some(handle),
        })
    }
}

impl<T> Owned<T> {
    /// Waits for the thread to end: what it returned, or `None` if it
    /// panicked (logged).
    pub fn join(mut self) -> Option<T> {
        self.wait()
    }

    /// True once the thread has ended (it still wants joining).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    fn wait(&mut self) -> Option<T> {
        match self.handle.take()?.join() {
            Ok(v) => Some(v),
            Err(panic) => {
                error!(
                    "thread '{}' ended in a panic: {}",
                    self.name,
                    message(&*panic)
                );
                None
            }
        }
    }
}

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        self.wait();
    }
}

/// What a panic said, if it said it as text.
fn message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_is_joined_on_drop_and_a_panic_is_no_result() {
        let (tx, rx) = crossbeam_channel::bounded(0);
        let t = Owned::spawn("owned-test", move || rx.recv().unwrap_or(0)).unwrap();
        assert!(!t.is_finished());
        tx.send(7).unwrap();
        assert_eq!(t.join(), Some(7));
        let p = Owned::spawn("owned-panic", || -> u32 { panic!("on purpose") }).unwrap();
        assert_eq!(p.join(), None);
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
        drop(Owned::spawn("owned-drop", move || drop(done_tx)).unwrap());
        // Dropped means joined: the thread is over, its sender gone.
        assert!(matches!(
            done_rx.try_recv(),
            Err(crossbeam_channel::TryRecvError::Disconnected)
        ));
    }
}
