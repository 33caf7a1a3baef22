"""What ``python -m cupyconv demo`` prints: one stream (stdout), and once
the note that training figures run worse than test figures by design."""

from cupyconv.demo import train


def test_one_stream_and_the_train_figures_note_once(capsys):
    assert train.main(["--train-size", "64", "--test-size", "32", "--epochs", "2",
                       "--batch-size", "32", "--device", "cpu", "--no-plots"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    starts = ["cupyconv demo:", "  data generated", "before training:", "(train figures",
              " statistics", " which", "epoch 1/2", "epoch 2/2", "final test accuracy"]
    assert [line[:len(start)] for line, start in zip(lines, starts)] == starts, lines
    assert captured.out.count(train.TRAIN_FIGURES_NOTE) == 1
    note = " ".join(train.TRAIN_FIGURES_NOTE.split())
    assert "dropout on" in note and "batch statistics" in note
    assert "worse than the test figures" in note
