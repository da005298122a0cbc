//! Tamper evidence: the sealer chains the trail in commit order, and `verify` names the first
//! row the owner changed, deleted or inserted out of band.

use keel_audit::AuditKind;
use keel_audit::postgres::insert;
use keel_audit::seal::{SealKey, SealOutcome, Tampering, seal, verify};
use keel_testkit::RoleSplitDatabase;

use crate::sample;

fn key() -> SealKey {
    SealKey::new("test-1", b"a seal key of at least 32 bytes!!".to_vec()).unwrap()
}

/// Three rows written by the application role and sealed by the owner; their ids.
async fn sealed_trail() -> (RoleSplitDatabase, Vec<i64>) {
    let db = keel_testkit::role_split_database().await;
    let mut app = db.app().acquire().await.unwrap();
    let mut ids = Vec::new();
    for n in 1..=3 {
        ids.push(
            insert(&mut app, &sample(AuditKind::PropagationApplied, n))
                .await
                .unwrap()
                .0,
        );
    }
    let mut owner = db.owner().acquire().await.unwrap();
    // Other tests' transactions on the shared server may hold the horizon back for a moment.
    let mut sealed = 0;
    for _ in 0..1200 {
        match seal(&mut owner, &key(), 2).await.unwrap() {
            SealOutcome::Sealed { rows, .. } => sealed += rows,
            SealOutcome::UpToDate | SealOutcome::Busy => {}
            SealOutcome::KeyMismatch { checkpoint } => {
                panic!("the test key cannot verify checkpoint {checkpoint}")
            }
        }
        if sealed == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(sealed, 3);
    assert_eq!(
        seal(&mut owner, &key(), 2).await.unwrap(),
        SealOutcome::UpToDate
    );
    let clean = verify(&mut owner, &key(), None).await.unwrap();
    assert_eq!(clean.tampering, None, "{clean:?}");
    assert_eq!(clean.links, 3);
    let (first, batches): (i64, i64) =
        sqlx::query_as("SELECT min(seq), count(*) FROM audit_checkpoints")
            .fetch_one(&mut *owner)
            .await
            .unwrap();
    assert_eq!(
        clean.checkpoints, batches as u64,
        "one signed checkpoint per sealing batch"
    );
    // Verification may also start from a signed checkpoint.
    let from = verify(&mut owner, &key(), Some(first)).await.unwrap();
    assert_eq!((from.links, from.tampering), ((3 - first) as u64, None));
    (db, ids)
}

/// Seals with `key` until `rows` rows are sealed (other tests' transactions on the shared
/// server may hold the horizon back for a moment); how many were.
async fn seal_until(owner: &mut sqlx::PgConnection, key: &SealKey, rows: u64) -> u64 {
    let mut sealed = 0;
    for _ in 0..1200 {
        if let SealOutcome::Sealed { rows, .. } = seal(owner, key, 10).await.unwrap() {
            sealed += rows;
        }
        if sealed >= rows {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    sealed
}

/// [`sealed_trail`] and a fourth row, written by the application role and not sealed yet.
async fn sealed_trail_and_one_more_row() -> RoleSplitDatabase {
    let (db, _) = sealed_trail().await;
    let mut app = db.app().acquire().await.unwrap();
    insert(&mut app, &sample(AuditKind::PropagationApplied, 4))
        .await
        .unwrap();
    drop(app);
    db
}

async fn as_owner(db: &RoleSplitDatabase, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(db.owner())
        .await
        .unwrap();
}

async fn first_tampering(db: &RoleSplitDatabase) -> Option<Tampering> {
    let mut owner = db.owner().acquire().await.unwrap();
    verify(&mut owner, &key(), None).await.unwrap().tampering
}

#[tokio::test]
async fn verify_names_a_row_the_owner_changed() {
    let (db, ids) = sealed_trail().await;
    as_owner(
        &db,
        &format!(
            "ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update_delete; \
             UPDATE audit_events SET actor = 'forged' WHERE id = {}; \
             ALTER TABLE audit_events ENABLE TRIGGER audit_events_no_update_delete",
            ids[1]
        ),
    )
    .await;
    assert_eq!(
        first_tampering(&db).await,
        Some(Tampering::Changed { id: ids[1], seq: 2 })
    );
}

#[tokio::test]
async fn verify_names_a_row_the_owner_deleted() {
    let (db, ids) = sealed_trail().await;
    as_owner(
        &db,
        &format!(
            "ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update_delete; \
             DELETE FROM audit_events WHERE id = {}",
            ids[0]
        ),
    )
    .await;
    assert_eq!(
        first_tampering(&db).await,
        Some(Tampering::Deleted { id: ids[0], seq: 1 })
    );
}

#[tokio::test]
async fn verify_names_a_row_the_owner_inserted_into_the_sealed_past() {
    let (db, ids) = sealed_trail().await;
    let forged: i64 = sqlx::query_scalar(
        "INSERT INTO audit_events (kind, actor, occurred_at, txid) \
         SELECT 'propagation.applied', 'system', now(), txid FROM audit_events WHERE id = $1 \
         RETURNING id",
    )
    .bind(ids[0])
    .fetch_one(db.owner())
    .await
    .unwrap();
    assert_eq!(
        first_tampering(&db).await,
        Some(Tampering::Inserted { id: forged })
    );
}

#[tokio::test]
async fn a_rewritten_chain_contradicts_its_signed_checkpoints() {
    let (db, ids) = sealed_trail().await;
    // The owner edits a row and rewrites the links after it; without the key, the signed
    // checkpoints still hold the old hashes.
    as_owner(
        &db,
        &format!(
            "ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update_delete; \
             UPDATE audit_events SET actor = 'forged' WHERE id = {}; \
             ALTER TABLE audit_seals DISABLE TRIGGER audit_seals_no_update_delete; \
             UPDATE audit_seals SET row_hash = sha256(row_hash) WHERE seq >= 1",
            ids[0]
        ),
    )
    .await;
    let found = first_tampering(&db).await;
    assert!(
        matches!(
            found,
            Some(Tampering::Changed { .. } | Tampering::Chain { .. })
        ),
        "{found:?}"
    );
    // The application role cannot write the chain at all.
    for sql in [
        "INSERT INTO audit_seals (seq, txid, event_id, row_hash) VALUES (99, '1', 1, '\\x00')",
        "DELETE FROM audit_checkpoints",
        "TRUNCATE audit_seals",
    ] {
        let err = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(db.app())
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("permission denied"),
            "{sql}: {err}"
        );
    }
}

/// A checkpoint under a key id the verifier does not hold is never skipped: a mistyped key id,
/// or an owner who relabels the real checkpoints, fails verification instead of "the trail
/// holds" with no checkpoint checked.
#[tokio::test]
async fn a_checkpoint_under_another_key_id_is_never_skipped() {
    let (db, _) = sealed_trail().await;
    let misnamed = SealKey::new("test-2", b"a seal key of at least 32 bytes!!".to_vec()).unwrap();
    let mut owner = db.owner().acquire().await.unwrap();
    let found = verify(&mut owner, &misnamed, None).await.unwrap();
    assert!(
        matches!(found.tampering, Some(Tampering::Chain { seq, .. }) if seq >= 1),
        "{found:?}"
    );
    drop(owner);
    as_owner(
        &db,
        "ALTER TABLE audit_checkpoints DISABLE TRIGGER audit_checkpoints_no_update_delete; \
         UPDATE audit_checkpoints SET key_id = 'other-key'; \
         ALTER TABLE audit_checkpoints ENABLE TRIGGER audit_checkpoints_no_update_delete",
    )
    .await;
    let found = first_tampering(&db).await;
    assert!(matches!(found, Some(Tampering::Chain { .. })), "{found:?}");
}

/// After a key rotation the rotated-out key's checkpoints come first: they are vouched for by
/// the new key's later checkpoints, so the trail still holds under the new key.
#[tokio::test]
async fn a_rotated_out_keys_earlier_checkpoints_do_not_fail_the_new_key() {
    let db = sealed_trail_and_one_more_row().await;
    let rotated = SealKey::new("test-2", b"the next seal key, 32 bytes long".to_vec()).unwrap();
    let mut owner = db.owner().acquire().await.unwrap();
    assert_eq!(seal_until(&mut owner, &rotated, 1).await, 1);
    let found = verify(&mut owner, &rotated, None).await.unwrap();
    assert_eq!(
        (found.tampering, found.links, found.checkpoints),
        (None, 4, 1)
    );
    // The old key now sees a newer checkpoint it cannot check: not a trail that holds.
    let old = verify(&mut owner, &key(), None).await.unwrap();
    assert!(
        matches!(old.tampering, Some(Tampering::Chain { seq: 4, .. })),
        "{old:?}"
    );
}

/// A different key under an id that already signed checkpoints seals nothing: signing on would
/// leave every earlier checkpoint of that id unverifiable with either key. The trail still
/// verifies with the original key, and the new key seals under an id of its own.
#[tokio::test]
async fn a_new_key_under_an_id_already_used_seals_nothing() {
    let db = sealed_trail_and_one_more_row().await;
    let mut owner = db.owner().acquire().await.unwrap();
    let (last, signed_before): (i64, i64) =
        sqlx::query_as("SELECT max(seq), count(*) FROM audit_checkpoints")
            .fetch_one(&mut *owner)
            .await
            .unwrap();
    let impostor = SealKey::new("test-1", b"another key of at least 32 bytes".to_vec()).unwrap();
    assert_eq!(
        seal(&mut owner, &impostor, 10).await.unwrap(),
        SealOutcome::KeyMismatch { checkpoint: last }
    );
    let (seals, checkpoints): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM audit_seals), (SELECT count(*) FROM audit_checkpoints)",
    )
    .fetch_one(&mut *owner)
    .await
    .unwrap();
    assert_eq!(seals, 3, "nothing was sealed");
    assert_eq!(checkpoints, signed_before, "nothing was signed");
    let held = verify(&mut owner, &key(), None).await.unwrap();
    assert_eq!(held.tampering, None, "{held:?}");
    let own_id = SealKey::new("test-3", b"another key of at least 32 bytes".to_vec()).unwrap();
    assert_eq!(seal_until(&mut owner, &own_id, 1).await, 1);
}
