"""pce_timm.utils.markdown_table: the package's one markdown table (benchmark, routing reports, model cards)."""
import pytest

from pce_timm.utils import markdown_table


def test_markdown_table_aligns_columns_and_escapes_nothing_itself():
    table = markdown_table(['model', 'top-1 %'], [['pce', '93.43'], ['dense', '93.51']], '<>')
    assert table.split('\n') == [
        '| model | top-1 % |',
        '|---|---:|',
        '| pce | 93.43 |',
        '| dense | 93.51 |',
    ]
    assert markdown_table(['a'], []) == '| a |\n|---|'


@pytest.mark.parametrize('align', ['<', '<^', '<<<'])
def test_markdown_table_rejects_bad_alignment(align):
    with pytest.raises(ValueError, match='one .<. or .>. per column'):
        markdown_table(['a', 'b'], [], align)


def test_markdown_table_rejects_a_row_of_the_wrong_width():
    with pytest.raises(ValueError, match='a row has 1 cells for 2 columns'):
        markdown_table(['a', 'b'], [['x']])
