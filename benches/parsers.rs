//! Parser micro-benchmarks: SMTP replies and commands, the DATA decoder,
//! dot-stuffing, the MM4 check and routing, on realistic 2 KiB input.

use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use mm4relay::config::Mm4Check;
use mm4relay::mm4;
use mm4relay::route::np::NpTable;
use mm4relay::route::{Address, Router};
use mm4relay::sim::forward_req;
use mm4relay::smtp::Reply;
use mm4relay::smtp::codec::{DataDecoder, dot_stuff};
use mm4relay::smtp::command::Command;

const RCPT: &str = "+12025550142/TYPE=PLMN@mms.mnc020.mcc001.gprs";

fn smtp(c: &mut Criterion) {
    let ehlo = b"250-mms.mnc020.mcc001.gprs\r\n250-PIPELINING\r\n250-SIZE 2097152\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n";
    c.bench_function("reply/parse_ehlo", |b| {
        b.iter(|| Reply::parse(black_box(ehlo)))
    });
    let mail =
        b"MAIL FROM:<+447700900123/TYPE=PLMN@mms.mnc010.mcc001.gprs> SIZE=2048 BODY=8BITMIME";
    c.bench_function("command/parse_mail", |b| {
        b.iter(|| Command::parse(black_box(mail)))
    });

    let msg = forward_req(1, RCPT, 2048);
    let mut wire = Vec::new();
    dot_stuff(&msg, &mut wire);
    let mut g = c.benchmark_group("data");
    g.throughput(Throughput::Bytes(msg.len() as u64));
    g.bench_function("decode_2k", |b| {
        b.iter(|| {
            let mut d = DataDecoder::new(1 << 21);
            d.feed(black_box(&wire));
            d.finish()
        })
    });
    g.bench_function("stuff_2k", |b| {
        let mut out = Vec::with_capacity(4096);
        b.iter(|| {
            out.clear();
            dot_stuff(black_box(&msg), &mut out);
        })
    });
    g.bench_function("mm4_check_2k", |b| {
        let limits = mm4::Limits::default();
        b.iter(|| mm4::check(black_box(&msg), &[RCPT], Mm4Check::Strict, &limits))
    });
    g.finish();
}

fn routing(c: &mut Criterion) {
    let mut r = Router::new();
    for i in 0..1000 {
        r.add_prefix(&format!("+1{:06}", i * 7), i % 50);
        r.add_domain(
            &format!("mms.mnc{:03}.mcc{:03}.gprs", i % 1000, i / 3),
            i % 50,
        );
    }
    r.set_ported(std::sync::Arc::new(NpTable::from_entries(&[(
        "+12025550177",
        3,
    )])));
    c.bench_function("route/parse_and_route", |b| {
        b.iter(|| {
            Address::parse_envelope(black_box(RCPT))
                .ok()
                .and_then(|a| r.route(&a))
        })
    });
}

criterion_group!(benches, smtp, routing);
criterion_main!(benches);
