//! Tamper evidence (feature `postgres`): a hash chain over `audit_events` in commit order, with
//! signed checkpoints, and a verifier that names the first row changed, deleted or inserted
//! out of band.
//!
//! [`seal`] (single-flight: one sealer at a time, by advisory lock) takes the rows of finished
//! transactions after the last sealed one, in commit order (`txid`, `id`), and appends to
//! `audit_seals` one link per row: `row_hash = sha256(prev_hash ‖ canonical row)`. It then
//! writes a checkpoint to `audit_checkpoints`: the last link's position and hash, signed with
//! HMAC-SHA256 under a key the database never sees. The application role can read both tables
//! and write neither.
//!
//! [`verify`] recomputes the chain from the rows themselves, from the start or from a
//! checkpoint whose signature holds, and compares it with the stored links and every signed
//! checkpoint. An owner who edits a row, deletes one, or inserts one into the sealed past is
//! named; one who also rewrites `audit_seals` is caught by the first signed checkpoint the
//! rewrite contradicts, since the key is not in the database.

use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::{Digest as _, Sha256};
use sqlx::{Acquire as _, PgConnection};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::sink::AuditSinkError;

type HmacSha256 = Hmac<Sha256>;

/// The key checkpoints are signed with (HMAC-SHA256), with an id naming it in each checkpoint.
/// Its bytes never reach a log or the database.
#[derive(Clone)]
pub struct SealKey {
    id: String,
    secret: Vec<u8>,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealKey({}, <redacted>)", self.id)
    }
}

/// A seal key that is too short or has a bad id.
#[derive(Debug, thiserror::Error)]
#[error(
    "a seal key needs at least 32 bytes and an id of 1 to 64 characters of [a-z0-9._-] (the key \
     is not shown)"
)]
pub struct InvalidSealKey;

impl SealKey {
    /// A key of at least 32 bytes, named `id` in the checkpoints it signs.
    pub fn new(id: &str, secret: impl Into<Vec<u8>>) -> Result<Self, InvalidSealKey> {
        let secret = secret.into();
        let id_ok = !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if secret.len() < 32 || !id_ok {
            return Err(InvalidSealKey);
        }
        Ok(Self {
            id: id.to_owned(),
            secret,
        })
    }

    /// The key's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn sign(&self, seq: i64, hash: &[u8]) -> Vec<u8> {
        let mut mac = HmacSha256::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(b"keel-audit-checkpoint\0");
        mac.update(self.id.as_bytes());
        mac.update(b"\0");
        mac.update(&seq.to_be_bytes());
        mac.update(hash);
        mac.finalize().into_bytes().to_vec()
    }
}

/// What one [`seal`] call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealOutcome {
    /// Rows were sealed; the chain now ends at `last_seq`, with a signed checkpoint there.
    Sealed {
        /// How many rows were added to the chain.
        rows: u64,
        /// The chain's last position.
        last_seq: i64,
    },
    /// Nothing new to seal.
    UpToDate,
    /// Another sealer holds the lock; nothing was done.
    Busy,
    /// The newest checkpoint signed under this key's id does not verify with this key: the key
    /// was replaced under the same id. Nothing was sealed: signing on would leave every earlier
    /// checkpoint of that id unverifiable. Give the new key an id of its own.
    KeyMismatch {
        /// The checkpoint this key cannot verify.
        checkpoint: i64,
    },
}

/// The first difference [`verify`] found between the rows and the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tampering {
    /// A sealed row's content no longer hashes to its link.
    Changed {
        /// `audit_events.id` of the row.
        id: i64,
        /// Its position in the chain.
        seq: i64,
    },
    /// A sealed row is gone.
    Deleted {
        /// `audit_events.id` the link names.
        id: i64,
        /// Its position in the chain.
        seq: i64,
    },
    /// A row sits in the sealed past (commit order before the last link) without a link.
    Inserted {
        /// `audit_events.id` of the row.
        id: i64,
    },
    /// A stored link or checkpoint disagrees with the chain recomputed from the rows (the
    /// chain table itself was rewritten), or a checkpoint's signature does not hold.
    Chain {
        /// The first position where they disagree.
        seq: i64,
        /// What disagrees.
        what: &'static str,
    },
    /// Not a difference: the checkpoint [`verify`] was asked to start from does not exist (no
    /// checkpoint at all at that position, under any key id), so nothing after it was verified.
    /// Usually a mistyped position; never to be taken for a chain that holds.
    NoSuchCheckpoint {
        /// The position asked for.
        seq: i64,
    },
}

impl std::fmt::Display for Tampering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tampering::Changed { id, seq } => {
                write!(
                    f,
                    "audit row {id} (seal {seq}) was changed after it was sealed"
                )
            }
            Tampering::Deleted { id, seq } => {
                write!(
                    f,
                    "audit row {id} (seal {seq}) was deleted after it was sealed"
                )
            }
            Tampering::Inserted { id } => {
                write!(
                    f,
                    "audit row {id} was inserted into the sealed past, out of band"
                )
            }
            Tampering::Chain { seq, what } => write!(f, "the seal chain at {seq}: {what}"),
            Tampering::NoSuchCheckpoint { seq } => {
                write!(f, "no checkpoint {seq}: nothing was verified from it")
            }
        }
    }
}

/// What [`verify`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verification {
    /// Links checked.
    pub links: u64,
    /// Signed checkpoints checked.
    pub checkpoints: u64,
    /// Links whose rows left with a detached month (`keel_audit::retention`): their absence is
    /// expected, and the signed checkpoints among them still hold.
    pub retired: u64,
    /// The first difference, if any.
    pub tampering: Option<Tampering>,
}

#[derive(sqlx::FromRow)]
pub(crate) struct ChainRow {
    pub(crate) txid: i64,
    pub(crate) id: i64,
    pub(crate) kind: String,
    pub(crate) actor: String,
    pub(crate) team_id: Option<Uuid>,
    pub(crate) resource_id: Option<Uuid>,
    pub(crate) request_id: Option<String>,
    pub(crate) attributes: String,
    pub(crate) occurred_at: OffsetDateTime,
    pub(crate) recorded_at: OffsetDateTime,
}

/// The canonical bytes of a row: every column, length-prefixed, in a fixed order; times as
/// UTC nanoseconds; attributes as Postgres' own normalised `jsonb` text.
fn canonical(row: &ChainRow) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    fn optional(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
        match bytes {
            None => out.push(0),
            Some(b) => {
                out.push(1);
                field(out, b);
            }
        }
    }
    let mut out = b"keel-audit-row-v1".to_vec();
    field(&mut out, &row.txid.to_be_bytes());
    field(&mut out, &row.id.to_be_bytes());
    field(&mut out, row.kind.as_bytes());
    field(&mut out, row.actor.as_bytes());
    optional(
        &mut out,
        row.team_id.as_ref().map(|u| u.as_bytes().as_slice()),
    );
    optional(
        &mut out,
        row.resource_id.as_ref().map(|u| u.as_bytes().as_slice()),
    );
    optional(&mut out, row.request_id.as_deref().map(str::as_bytes));
    field(&mut out, row.attributes.as_bytes());
    field(
        &mut out,
        &row.occurred_at.unix_timestamp_nanos().to_be_bytes(),
    );
    field(
        &mut out,
        &row.recorded_at.unix_timestamp_nanos().to_be_bytes(),
    );
    out
}

pub(crate) fn link(prev: &[u8], row: &ChainRow) -> Vec<u8> {
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update(canonical(row));
    hasher.finalize().to_vec()
}

const GENESIS: [u8; 32] = [0; 32];

pub(crate) const ROW_COLUMNS: &str = "txid::text::bigint AS txid, id, kind, actor, team_id, resource_id, \
                           request_id, attributes::text AS attributes, occurred_at, recorded_at";

fn store(operation: &'static str) -> impl FnOnce(sqlx::Error) -> AuditSinkError {
    move |e| AuditSinkError::store(operation, e)
}

/// Seals up to `batch` rows of finished transactions after the last sealed one, then signs a
/// checkpoint at the new end of the chain. Single-flight: a concurrent call returns
/// [`SealOutcome::Busy`]. A key that cannot verify the newest checkpoint signed under its id
/// seals nothing ([`SealOutcome::KeyMismatch`]). Run it as a role that may insert into `audit_seals` and
/// `audit_checkpoints` (the owner, or one granted by `keel_schema::roles::grant_sealer_role`).
pub async fn seal(
    conn: &mut PgConnection,
    key: &SealKey,
    batch: u32,
) -> Result<SealOutcome, AuditSinkError> {
    let mut tx = conn.begin().await.map_err(store("begin sealing"))?;
    let locked: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext('keel-audit-sealer'))")
            .fetch_one(&mut *tx)
            .await
            .map_err(store("take the sealer lock"))?;
    if !locked {
        return Ok(SealOutcome::Busy);
    }
    let signed: Option<(i64, Vec<u8>, Vec<u8>)> = sqlx::query_as(
        "SELECT seq, row_hash, signature FROM audit_checkpoints WHERE key_id = $1 \
         ORDER BY seq DESC LIMIT 1",
    )
    .bind(key.id())
    .fetch_optional(&mut *tx)
    .await
    .map_err(store("read the last checkpoint of this key"))?;
    if let Some((checkpoint, hash, signature)) = signed
        && key.sign(checkpoint, &hash) != signature
    {
        return Ok(SealOutcome::KeyMismatch { checkpoint });
    }
    let last: Option<(i64, i64, i64, Vec<u8>)> = sqlx::query_as(
        "SELECT seq, txid::text::bigint, event_id, row_hash FROM audit_seals \
         ORDER BY seq DESC LIMIT 1",
    )
    .fetch_optional(&mut *tx)
    .await
    .map_err(store("read the end of the seal chain"))?;
    let (mut seq, cursor_txid, cursor_id, mut prev) = last.unwrap_or((0, 0, 0, GENESIS.to_vec()));
    let rows: Vec<ChainRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ROW_COLUMNS} FROM audit_events \
         WHERE (txid, id) > ($1::text::xid8, $2) \
           AND txid < pg_snapshot_xmin(pg_current_snapshot()) \
         ORDER BY txid, id LIMIT $3"
    )))
    .bind(cursor_txid.to_string())
    .bind(cursor_id)
    .bind(i64::from(batch))
    .fetch_all(&mut *tx)
    .await
    .map_err(store("read rows to seal"))?;
    if rows.is_empty() {
        return Ok(SealOutcome::UpToDate);
    }
    let (mut seqs, mut txids, mut ids, mut hashes) = (vec![], vec![], vec![], vec![]);
    for row in &rows {
        seq += 1;
        prev = link(&prev, row);
        seqs.push(seq);
        txids.push(row.txid.to_string());
        ids.push(row.id);
        hashes.push(prev.clone());
    }
    sqlx::query(
        "INSERT INTO audit_seals (seq, txid, event_id, row_hash) \
         SELECT s, t::xid8, e, h FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::bytea[]) \
              AS u(s, t, e, h)",
    )
    .bind(&seqs)
    .bind(&txids)
    .bind(&ids)
    .bind(&hashes)
    .execute(&mut *tx)
    .await
    .map_err(store("append to the seal chain"))?;
    sqlx::query(
        "INSERT INTO audit_checkpoints (seq, row_hash, key_id, signature) VALUES ($1, $2, $3, $4)",
    )
    .bind(seq)
    .bind(&prev)
    .bind(key.id())
    .bind(key.sign(seq, &prev))
    .execute(&mut *tx)
    .await
    .map_err(store("sign a checkpoint"))?;
    tx.commit().await.map_err(store("commit the seals"))?;
    Ok(SealOutcome::Sealed {
        rows: rows.len() as u64,
        last_seq: seq,
    })
}

/// Recomputes the chain from the rows and checks it against the stored links and every
/// checkpoint signed with `key`, starting after checkpoint `from` (its signature must hold) or
/// from the first row. Returns the first difference in chain order. A checkpoint under another
/// key id is a difference too ([`Tampering::Chain`]) unless it comes before `key`'s last
/// checkpoint (which signs the chain through it: a rotated-out key's, for example). A `from`
/// with no checkpoint at all at that position is [`Tampering::NoSuchCheckpoint`] (nothing was
/// verified), once every checkpoint's signature has been checked.
pub async fn verify(
    conn: &mut PgConnection,
    key: &SealKey,
    from: Option<i64>,
) -> Result<Verification, AuditSinkError> {
    let mut tx = conn.begin().await.map_err(store("begin verifying"))?;
    let found = verify_in(&mut tx, key, from).await;
    // Read-only: ended at once, so the connection holds no snapshot or lock afterwards.
    tx.rollback().await.map_err(store("end the verification"))?;
    found
}

async fn verify_in(
    tx: &mut PgConnection,
    key: &SealKey,
    from: Option<i64>,
) -> Result<Verification, AuditSinkError> {
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await
        .map_err(store("take a snapshot"))?;
    let checkpoints: Vec<(i64, Vec<u8>, String, Vec<u8>)> = sqlx::query_as(
        "SELECT seq, row_hash, key_id, signature FROM audit_checkpoints ORDER BY seq",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(store("read the checkpoints"))?;
    let mut verification = Verification {
        links: 0,
        checkpoints: 0,
        retired: 0,
        tampering: None,
    };
    let mut signed = std::collections::BTreeMap::new();
    let start = from.unwrap_or(0);
    // A checkpoint under another key id cannot be checked. A checkpoint signs the chain up to
    // it, so this key's last checkpoint vouches for every link before it, through any other
    // key's checkpoints there (a rotated-out key's, or one a retention detach signed at an old
    // position). One after this key's last checkpoint, or any when this key has none, is never
    // skipped: an owner who relabels the real checkpoints (or an operator who mistypes the key
    // id) must not get "the trail holds" with nothing checked.
    let last_own = checkpoints
        .iter()
        .filter(|(seq, _, key_id, _)| *seq > start && key_id == key.id())
        .map(|(seq, ..)| *seq)
        .max();
    for (seq, hash, key_id, signature) in &checkpoints {
        if key_id != key.id() {
            if *seq > start && last_own.is_none_or(|last| *seq > last) {
                verification.tampering = Some(Tampering::Chain {
                    seq: *seq,
                    what: "the checkpoint is signed under a key id other than the one given, \
                           after (or without) any checkpoint of that key (check --seal-key-id)",
                });
                return Ok(verification);
            }
            continue;
        }
        if key.sign(*seq, hash) != *signature {
            verification.tampering = Some(Tampering::Chain {
                seq: *seq,
                what: "the checkpoint's signature does not hold",
            });
            return Ok(verification);
        }
        signed.insert(*seq, hash.clone());
    }
    let (start_seq, mut prev) = match from {
        None => (0, GENESIS.to_vec()),
        Some(seq) => match signed.get(&seq) {
            Some(hash) => (seq, hash.clone()),
            None if !checkpoints.iter().any(|(at, ..)| *at == seq) => {
                verification.tampering = Some(Tampering::NoSuchCheckpoint { seq });
                return Ok(verification);
            }
            None => {
                verification.tampering = Some(Tampering::Chain {
                    seq,
                    what: "the checkpoint at that position is not signed with this key",
                });
                return Ok(verification);
            }
        },
    };
    let links: Vec<(i64, i64, i64, Vec<u8>)> = sqlx::query_as(
        "SELECT seq, txid::text::bigint, event_id, row_hash FROM audit_seals \
         WHERE seq > $1 ORDER BY seq",
    )
    .bind(start_seq)
    .fetch_all(&mut *tx)
    .await
    .map_err(store("read the seal chain"))?;
    let retired: std::collections::HashSet<i64> = if to_regclass(tx, "audit_retired_links").await? {
        sqlx::query_scalar("SELECT seq FROM audit_retired_links WHERE seq > $1")
            .bind(start_seq)
            .fetch_all(&mut *tx)
            .await
            .map_err(store("read the retired links"))?
            .into_iter()
            .collect()
    } else {
        std::collections::HashSet::new()
    };
    let last = links.last().map(|(_, txid, id, _)| (*txid, *id));
    let start_cursor: (i64, i64) = if start_seq == 0 {
        (0, 0)
    } else {
        sqlx::query_as("SELECT txid::text::bigint, event_id FROM audit_seals WHERE seq = $1")
            .bind(start_seq)
            .fetch_optional(&mut *tx)
            .await
            .map_err(store("read the seal chain"))?
            .unwrap_or((0, 0))
    };
    // Every row in the sealed range, in commit order, beside the links.
    let rows: Vec<ChainRow> = match last {
        None => Vec::new(),
        Some((txid, id)) => sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {ROW_COLUMNS} FROM audit_events \
             WHERE (txid, id) > ($1::text::xid8, $2) AND (txid, id) <= ($3::text::xid8, $4) \
             ORDER BY txid, id"
        )))
        .bind(start_cursor.0.to_string())
        .bind(start_cursor.1)
        .bind(txid.to_string())
        .bind(id)
        .fetch_all(&mut *tx)
        .await
        .map_err(store("read the sealed rows"))?,
    };
    let mut rows = rows.into_iter().peekable();
    for (seq, txid, id, stored) in &links {
        // Rows before this link's position that have no link were inserted out of band.
        if let Some(row) = rows.peek()
            && (row.txid, row.id) < (*txid, *id)
        {
            verification.tampering = Some(Tampering::Inserted { id: row.id });
            return Ok(verification);
        }
        let row = match rows.peek() {
            Some(row) if (row.txid, row.id) == (*txid, *id) => rows.next(),
            _ => None,
        };
        let Some(row) = row else {
            if retired.contains(seq) {
                // The row left with a detached month, after its export was verified against
                // this link; the chain goes on from the stored link, which every signed
                // checkpoint at or after it still vouches for.
                if let Some(hash) = signed.get(seq) {
                    verification.checkpoints += 1;
                    if hash != stored {
                        verification.tampering = Some(Tampering::Chain {
                            seq: *seq,
                            what: "a retired link differs from a signed checkpoint",
                        });
                        return Ok(verification);
                    }
                }
                prev = stored.clone();
                verification.retired += 1;
                continue;
            }
            verification.tampering = Some(Tampering::Deleted { id: *id, seq: *seq });
            return Ok(verification);
        };
        let computed = link(&prev, &row);
        if computed != *stored {
            // The link was made from the row as it was: a row that no longer matches its own
            // link was changed; a link that no longer follows from the previous one means the
            // chain itself was rewritten.
            verification.tampering = Some(Tampering::Changed { id: *id, seq: *seq });
            return Ok(verification);
        }
        if let Some(hash) = signed.get(seq) {
            verification.checkpoints += 1;
            if *hash != computed {
                verification.tampering = Some(Tampering::Chain {
                    seq: *seq,
                    what: "the chain recomputed from the rows differs from a signed checkpoint",
                });
                return Ok(verification);
            }
        }
        prev = computed;
        verification.links += 1;
    }
    if let Some(row) = rows.next() {
        verification.tampering = Some(Tampering::Inserted { id: row.id });
    }
    Ok(verification)
}

async fn to_regclass(conn: &mut PgConnection, name: &str) -> Result<bool, AuditSinkError> {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(name)
        .fetch_one(conn)
        .await
        .map_err(store("look up a table"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seal_key_is_long_enough_and_never_printed() {
        assert!(SealKey::new("k1", vec![7u8; 31]).is_err());
        assert!(SealKey::new("K 1", vec![7u8; 32]).is_err());
        let key = SealKey::new("k1", b"0123456789abcdef0123456789abcdef".to_vec()).unwrap();
        assert!(!format!("{key:?}").contains("0123456789"));
        assert_ne!(key.sign(1, &[0; 32]), key.sign(2, &[0; 32]));
    }

    /// A start that names no checkpoint says so, and never reads as the chain holding.
    #[test]
    fn a_missing_start_checkpoint_is_named_as_such() {
        let missing = Tampering::NoSuchCheckpoint { seq: 42 };
        assert_eq!(
            missing.to_string(),
            "no checkpoint 42: nothing was verified from it"
        );
        assert_ne!(missing, Tampering::Chain { seq: 42, what: "x" });
    }
}
