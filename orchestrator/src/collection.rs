//! One kind of resource, held in memory and written through to the store.
//!
//! Reads (the bulk of API traffic) never touch the database: every record is
//! loaded at start and kept current by the writes that go through here. The
//! store's version check still guards each write, so a second writer (an
//! etcd-backed replica later) cannot be overwritten blindly.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::model::Resource;
use crate::store::{Store, StoreError};

struct Entry<T> {
    version: u64,
    value: Arc<T>,
}

pub struct Collection<T: Resource> {
    store: Arc<dyn Store>,
    items: RwLock<BTreeMap<String, Entry<T>>>,
    /// Grows with every write: what was computed from the items at one
    /// generation is still true while it has not moved.
    generation: AtomicU64,
    /// Wakes whoever waits for a change ([`Collection::subscribe`]).
    changed: tokio::sync::watch::Sender<u64>,
}

impl<T: Resource> Collection<T> {
    pub fn load(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        let mut items = BTreeMap::new();
        for record in store.list(T::KIND)? {
            let value: T =
                serde_json::from_value(record.body).map_err(|source| StoreError::Corrupt {
                    kind: T::KIND,
                    source,
                })?;
            items.insert(
                record.id,
                Entry {
                    version: record.version,
                    value: Arc::new(value),
                },
            );
        }
        Ok(Collection {
            store,
            items: RwLock::new(items),
            generation: AtomicU64::new(1),
            changed: tokio::sync::watch::Sender::new(1),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<String, Entry<T>>> {
        self.items.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<String, Entry<T>>> {
        self.items.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: &str) -> Option<Arc<T>> {
        self.read().get(id).map(|e| e.value.clone())
    }

    /// Every item for which `keep` holds, in id order.
    pub fn filter(&self, keep: impl Fn(&T) -> bool) -> Vec<Arc<T>> {
        self.read()
            .values()
            .filter(|e| keep(&e.value))
            .map(|e| e.value.clone())
            .collect()
    }

    pub fn find(&self, pred: impl Fn(&T) -> bool) -> Option<Arc<T>> {
        self.read()
            .values()
            .find(|e| pred(&e.value))
            .map(|e| e.value.clone())
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A receiver that sees every write: wait on it instead of polling.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.changed.send_replace(g);
    }

    /// Waits until `done` holds for the item (or it is gone: `None`), at
    /// most `timeout`; returns the item as it was last seen.
    pub async fn wait_for(
        &self,
        id: &str,
        timeout: std::time::Duration,
        done: impl Fn(&T) -> bool,
    ) -> Option<Arc<T>> {
        let mut rx = self.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            let item = self.get(id);
            if item.as_deref().is_none_or(&done) {
                return item;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return self.get(id);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stores a new item; its id must not exist yet.
    pub fn insert(&self, value: T) -> Result<Arc<T>, StoreError> {
        self.insert_unique(value, |_| false)
            .map(|inserted| inserted.unwrap_or_else(|existing| existing))
    }

    /// Stores a new item unless one for which `clashes` holds exists: the
    /// check and the write happen under one lock, so two concurrent
    /// requests for the same name cannot both pass it. `Err(existing)`
    /// when one clashed.
    pub fn insert_unique(
        &self,
        value: T,
        clashes: impl Fn(&T) -> bool,
    ) -> Result<Result<Arc<T>, Arc<T>>, StoreError> {
        let mut items = self.write();
        if let Some(existing) = items.values().find(|e| clashes(&e.value)) {
            return Ok(Err(existing.value.clone()));
        }
        let body = serde_json::to_value(&value).map_err(|source| StoreError::Corrupt {
            kind: T::KIND,
            source,
        })?;
        let version = self.store.put(T::KIND, value.id(), 0, &body)?;
        let value = Arc::new(value);
        items.insert(
            value.id().to_string(),
            Entry {
                version,
                value: value.clone(),
            },
        );
        self.bump();
        Ok(Ok(value))
    }

    /// Changes an item in place with `change` and stores it. Returns the
    /// new value, or `None` when there is no such item. `change` may refuse
    /// with its own error, in which case nothing is written.
    pub fn update<E: From<StoreError>>(
        &self,
        id: &str,
        change: impl FnOnce(&mut T) -> Result<(), E>,
    ) -> Result<Option<Arc<T>>, E> {
        let mut items = self.write();
        let Some(entry) = items.get(id) else {
            return Ok(None);
        };
        let mut value = (*entry.value).clone();
        change(&mut value)?;
        let body = serde_json::to_value(&value).map_err(|source| StoreError::Corrupt {
            kind: T::KIND,
            source,
        })?;
        let version = self.store.put(T::KIND, id, entry.version, &body)?;
        let value = Arc::new(value);
        items.insert(
            id.to_string(),
            Entry {
                version,
                value: value.clone(),
            },
        );
        self.bump();
        Ok(Some(value))
    }

    pub fn remove(&self, id: &str) -> Result<Option<Arc<T>>, StoreError> {
        let mut items = self.write();
        if !items.contains_key(id) {
            return Ok(None);
        }
        self.store.delete(T::KIND, id)?;
        self.bump();
        Ok(items.remove(id).map(|e| e.value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Flavor;
    use crate::store::sqlite::SqliteStore;

    #[test]
    fn writes_reach_the_store_and_survive_a_reload() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().unwrap());
        let c: Collection<Flavor> = Collection::load(store.clone()).unwrap();
        c.insert(Flavor {
            id: "1c2g".into(),
            vcpus: 1,
            memory_mib: 2048,
        })
        .unwrap();
        assert!(
            c.insert(Flavor {
                id: "1c2g".into(),
                vcpus: 9,
                memory_mib: 1,
            })
            .is_err()
        );
        c.update::<StoreError>("1c2g", |f| {
            f.vcpus = 2;
            Ok(())
        })
        .unwrap();
        let again: Collection<Flavor> = Collection::load(store.clone()).unwrap();
        assert_eq!(again.get("1c2g").unwrap().vcpus, 2);
        // The reloaded copy's versions are current: it can write too.
        again
            .update::<StoreError>("1c2g", |f| {
                f.vcpus = 3;
                Ok(())
            })
            .unwrap();
        // The first copy's is now stale: its write is refused, not lost.
        assert!(
            c.update::<StoreError>("1c2g", |f| {
                f.vcpus = 4;
                Ok(())
            })
            .is_err()
        );
        assert!(again.remove("1c2g").unwrap().is_some());
        assert!(again.get("1c2g").is_none());
    }
}
